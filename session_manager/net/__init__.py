"""Other machines: this installation's identity, paired peers and their agent, sending and live-migrating sessions,
hand-over, and remote repositories."""
