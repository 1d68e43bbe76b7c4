"""The cluster view: which nodes form the mail system, and their queues seen as one.

Owned by no process. The api process registers its node (elemta.api.registration) and
serves /api/v1/cluster/... (elemta.api.cluster_routes); `elemtactl --cluster queue ...`
(elemta.cli.clustercmd) asks the same things from the admin's shell. Both read the live
nodes from the store and call every node's own REST API with the cluster's api token.

    identity.py   this node's name, API URL and SMTP hand-over address
                  (cluster.node_name, cluster.api_url, cluster.handover_address)
    trust.py      which registered addresses get the api token or drained mail
                  (cluster.peer_networks): a rogue registry entry gets neither
    registry.py   the nodes in Valkey/Redis: one hash, a heartbeat with a lifetime each
    peers.py      one request to every live node at once: their answers, and which
                  nodes did not answer and why
    view.py       the queue operations across the nodes, and how answers are merged

Mail never crosses here: each node keeps its own queue; the view only reads and acts
on each node's queue through its REST API. A drained node hands its queue to the
others over SMTP (elemtactl drain, elemta.delivery.handover), finding them here.
See also: elemta.sharedstate (the checks' shared state), issue 19.
"""
