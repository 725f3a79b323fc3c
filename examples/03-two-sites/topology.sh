# Example 03's names and addresses, shared by run.sh and stop.sh (sourced, not run).
#
# Everything this example makes is named with the prefix df3- (namespaces, veths, the
# WireGuard interfaces and their sockets in /var/run/wireguard), so that stop.sh can
# find and remove it all — also after an interrupted run — and touch nothing else.
# Addresses come from 198.18.0.0/15 (reserved for network tests, RFC 2544) and exist
# only inside these namespaces; nothing is routed from the host's own namespace.
PREFIX=df3-
NS_A=df3-a          # site A LAN: sender Orthanc, archive Orthanc, DicomFlow
NS_GWA=df3-gwa      # site A's VPN gateway
NS_WAN=df3-wan      # the WAN: the UDP delay relay, and tbf caps on both veths
NS_GWB=df3-gwb      # site B's VPN gateway
NS_B=df3-b          # site B LAN: the remote Orthanc PACS
NAMESPACES="$NS_A $NS_GWA $NS_WAN $NS_GWB $NS_B"

NET_A=198.18.1.0/24;  IP_A=198.18.1.10;  IP_GWA_LAN=198.18.1.1
NET_B=198.18.2.0/24;  IP_B=198.18.2.10;  IP_GWB_LAN=198.18.2.1
IP_GWA_WAN=198.18.100.1; IP_WAN_A=198.18.100.2     # 198.18.100.0/30, gateway A <-> WAN
IP_WAN_B=198.18.100.5;   IP_GWB_WAN=198.18.100.6   # 198.18.100.4/30, WAN <-> gateway B
WG_PORT=51820
WG_A=df3-wga; WG_B=df3-wgb                         # one name each: wg's sockets are shared
WG_SOCKETS=/var/run/wireguard

# Ports (each namespace has its own, so they never clash with the host's).
ROUTER_PORT=11112
SENDER_HTTP=8041;  SENDER_DICOM=4241
ARCHIVE_HTTP=8042; ARCHIVE_DICOM=4242
SITEB_HTTP=8043;   SITEB_DICOM=4243

in_ns() { ip netns exec "$@"; }   # in_ns NAMESPACE COMMAND…
