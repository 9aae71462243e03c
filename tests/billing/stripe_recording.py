"""A stand-in for the network under the stripe library, for the Stripe APIs localstripe lacks
(Billing Meters, customer balance transactions): it answers as Stripe documents and records
every request, so tests check exactly what our adapter sends."""

import json
from urllib.parse import parse_qs, urlparse

import stripe

__all__ = ["DisputesBesideLocalstripe", "RecordingHTTPClient"]


class RecordingHTTPClient(stripe.HTTPClient):
    """Answers like Stripe would and keeps every request (a stand-in for the network only)."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.requests = []

    def request(self, method, url, headers, post_data=None, *, _usage=None):
        self.requests.append((method, url, dict(headers or {}), post_data))
        form = {k: v[0] for k, v in parse_qs(post_data or "").items()}
        if url.endswith("/balance_transactions"):
            body = {"id": f"cbtxn_{len(self.requests)}", "object": "customer_balance_transaction",
                    "amount": int(form["amount"]), "currency": form["currency"],
                    "customer": url.split("/")[-2], "type": "adjustment"}  # fmt: skip
        else:
            body = {"object": "billing.meter_event", "event_name": form.get("event_name"),
                    "identifier": form.get("identifier"), "timestamp": int(form["timestamp"]),
                    "payload": {"stripe_customer_id": form.get("payload[stripe_customer_id]"),
                                "value": form.get("payload[value]")}}  # fmt: skip
        return json.dumps(body), 200, {"Request-Id": "req_test"}

    def close(self):
        pass

    def sent(self):
        """(path, form) of every request, in order."""
        return [(url.removeprefix("https://api.stripe.com"), parse_qs(body or ""))
                for _, url, _, body in self.requests]  # fmt: skip


class DisputesBesideLocalstripe(stripe.RequestsClient):
    """localstripe has no disputes: GET /v1/disputes is answered with the disputes a test put
    in `disputes` (Stripe's dispute objects, one page as Stripe lists them); every other
    request goes on to localstripe."""

    name = "disputes-beside-localstripe"

    def __init__(self):
        super().__init__()
        self.disputes: list[dict] = []

    def request(self, method, url, headers, post_data=None):
        if method == "get" and urlparse(url).path == "/v1/disputes":
            body = {"object": "list", "url": "/v1/disputes", "has_more": False,
                    "data": self.disputes}  # fmt: skip
            return json.dumps(body), 200, {"Request-Id": "req_test"}
        return super().request(method, url, headers, post_data)
