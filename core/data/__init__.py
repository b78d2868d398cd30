"""x_0: the [data] section as a DataSource, the Dataset of a dataset plugin, the shared uint8 image store."""
