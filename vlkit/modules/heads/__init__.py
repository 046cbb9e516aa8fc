"""Answer heads that sit on top of a fusion encoder's features."""
