"""Code shared by both services and the client: no torch here."""
