"""The domain errors services raise. One DRF exception handler (config.api.errors) renders them.

Every error has a type (the family, as in Stripe's error objects), a machine-readable code, an
optional field, and a human message. The HTTP status follows from the type.
"""


class ApplicationError(Exception):
    type = "invalid_request_error"
    status_code = 400
    default_code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field

    def as_dict(self) -> dict:
        return {"type": self.type, "code": self.code, "field": self.field, "message": self.message}


class ValidationFailed(ApplicationError):
    default_code = "invalid"


class NotFound(ApplicationError):
    type = "not_found_error"
    status_code = 404
    default_code = "not_found"


class Gone(NotFound):
    """It existed and was deleted by retention (HTTP 410); to code asking only whether it is
    there, a NotFound."""

    status_code = 410
    default_code = "gone"


class PermissionDenied(ApplicationError):
    type = "permission_error"
    status_code = 403
    default_code = "permission_denied"


class InvalidTransition(ApplicationError):
    """The object's current state does not allow the action (HTTP 409)."""

    type = "conflict_error"
    status_code = 409
    default_code = "invalid_transition"


class Conflict(ApplicationError):
    type = "conflict_error"
    status_code = 409
    default_code = "conflict"


class NotAvailable(Conflict):
    default_code = "not_available"


class QuoteExpired(Conflict):
    default_code = "quote_expired"


class PaymentRequired(ApplicationError):
    """Not funded (HTTP 402). `recharge`, when an automatic recharge could fund it: the amount
    and currency it charges and its status ("started", or "confirm": asked for first)."""

    type = "payment_error"
    status_code = 402
    default_code = "payment_required"

    def __init__(self, message: str, *, recharge: dict | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.recharge = recharge

    def as_dict(self) -> dict:
        d = super().as_dict()
        if self.recharge is not None:
            d["recharge"] = self.recharge
        return d
