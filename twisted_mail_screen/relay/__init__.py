"""Outbound mail: the queue, the SMTP client and delivery status notices."""
