"""What every app's admin shares: records written by services, tasks and agents, which staff
look at and never edit."""

from django.contrib import admin
from django.db.models import URLField


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
