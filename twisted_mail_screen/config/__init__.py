"""Configuration: the TOML file parsed once into frozen, typed settings."""
