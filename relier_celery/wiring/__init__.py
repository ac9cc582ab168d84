"""Wiring into Celery and kombu: ``install``, the bootsteps, the consumer hooks, the signal
handlers, the reliable fetch and the kombu guard. The only code that imports ``celery.worker``,
``kombu.transport`` or ``billiard``, or patches a class. (Named ``wiring`` rather than
``integration`` so that it is not confused with the repository's ``integration/`` tests.)"""
