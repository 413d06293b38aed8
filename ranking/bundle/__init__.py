"""The bundle format: versioned directories and their manifest, the loaded model's arrays, id maps and segment scheme."""
