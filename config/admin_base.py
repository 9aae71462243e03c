"""What every app's admin shares: records written by services, tasks and agents, which staff
look at and never edit."""

from django import forms
from django.contrib import admin
from django.db.models import URLField

from config.currency import currency_refusal


def currency_clean(value: str) -> str:
    """A currency staff type (a rate card's, an account's), lower-cased, held to the rule
    settings.CURRENCY keeps (config.currency.currency_refusal)."""
    code = (value or "").strip().lower()
    refusal = currency_refusal(code)
    if refusal:
        raise forms.ValidationError(refusal)
    return code


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records written by services, tasks and agents: staff look, never edit."""

    # The (read-only) form's URL fields as the portal's: a URL without a scheme is https.
    formfield_overrides = {URLField: {"assume_scheme": "https"}}

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
