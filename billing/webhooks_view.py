"""POST /api/v1/webhooks/stripe — Stripe's deliveries. Verify, store once, answer at once."""

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing.services.webhooks import InvalidSignature, webhook_receive

__all__ = ["stripe_webhook"]


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    try:
        event, created = webhook_receive(
            payload=request.body,
            signature=request.headers.get("Stripe-Signature", ""),
            secret=settings.STRIPE_WEBHOOK_SECRET,
        )
    except InvalidSignature:
        body = {"type": "invalid_request_error", "code": "invalid_signature", "field": None,
                "message": "The Stripe-Signature header does not verify."}  # fmt: skip
        return JsonResponse({"error": body}, status=400)
    return JsonResponse({"received": True, "duplicate": not created})
