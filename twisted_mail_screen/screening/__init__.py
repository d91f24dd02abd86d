"""Dynamic screening of abusive clients: rules, lists, freezes, notices."""
