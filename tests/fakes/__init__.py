"""Stand-ins for the world outside: a fake HTTP upstream."""
