"""The bundle format: versioned directories, manifest and declared arrays; the loaded model's arrays and id maps."""
