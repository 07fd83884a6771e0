"""Review: human labels on steps, critic evaluation against them, and the review pages."""
