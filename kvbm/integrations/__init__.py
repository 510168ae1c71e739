"""Engine integrations. Each subpackage imports its engine; ``import kvbm`` imports none of them."""
