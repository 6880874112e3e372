"""autofs mount healer: unmounts severed FUSE mounts under autofs roots so that
the next access mounts them again."""
