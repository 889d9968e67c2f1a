"""What ROME-family methods share: context templates, keys at the subject, target values, statistics."""
