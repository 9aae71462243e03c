from django import forms
from django.contrib.auth.forms import UserCreationForm

__all__ = ["SignupForm", "OrganizationForm"]


class SignupForm(UserCreationForm):
    email = forms.EmailField(help_text="Where notices about your reservations and billing go.")
    organization = forms.CharField(
        label="Organisation name", max_length=100, help_text="Your team or company."
    )

    class Meta(UserCreationForm.Meta):
        fields = ("username", "email")


class OrganizationForm(forms.Form):
    name = forms.CharField(label="Organisation name", max_length=100)
