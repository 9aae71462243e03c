import pytest


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # Factories hash a password per user; PBKDF2's cost is pointless in tests.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
