"""The package version, in a module of its own so that code inside the package reads it without importing the
package (whose ``__init__`` imports the whole runtime)."""

__version__ = "0.1.0"
