"""The host agent: a supervisord event listener that rolls this host's services."""
