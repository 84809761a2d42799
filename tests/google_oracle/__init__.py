"""Google's own logits as fixtures: ``make_logits.py`` writes them with Google's Flax code, and
``tests/test_google_parity.py`` holds our models to them (docs/models.md, "Google's numerics")."""
