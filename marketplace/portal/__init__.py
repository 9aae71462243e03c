"""The customer web portal: server-rendered pages over the same services and selectors as the API.

Signed-in members act for one of their organisations at a time (the session remembers which);
every page reads and writes through the services the REST API uses, so the rules (roles,
funding, availability, transitions) are the same whichever way a customer comes in.
"""
