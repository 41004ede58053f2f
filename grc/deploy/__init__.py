"""``grc deploy``: start a real server on a built bundle, prove it answers, report the endpoint."""
