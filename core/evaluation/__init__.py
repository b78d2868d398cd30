"""What a run measures and shows: trajectory errors and distances, sample quality through the metric plugins, figures and image grids."""
