"""fastflamingo: fast Flamingo."""
