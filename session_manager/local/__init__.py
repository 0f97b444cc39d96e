"""What runs on this machine: sessions, their settings, the engine, autosave and the daemon."""
