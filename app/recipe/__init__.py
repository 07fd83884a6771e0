"""Pure recipe logic: steps, masking policies, rendering. No database, HTTP or torch."""
