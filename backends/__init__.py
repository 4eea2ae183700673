"""Built-in backend plugins. Each module is an ordinary plugin, loaded through the ``dspark_lab`` entry points."""
