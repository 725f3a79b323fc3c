"""The web daemon's parts: Prometheus metrics, health for load balancers, the HTTP
server and the read-only status page (the daemon itself: :mod:`services.web`)."""
