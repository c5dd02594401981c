"""Engine integrations. Each engine lives in its own subpackage and is the only code importing it."""
