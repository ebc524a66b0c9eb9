"""Starting, inspecting and stopping a cluster described in a TOML file, on this machine and over ssh."""
