"""Scripts the suite runs in other interpreters, by path; none of them imports tq_loader.

``peer_driver.py`` drives TransferQueue 0.1.11 (in its own venv) or Ray's object store through the
loop of ``workloads.py``; ``zmq_peer.py`` is the far end of the raw pyzmq loopback baseline. They
report on stdout as lines ``@@bench <json>`` (``subproc.py`` reads them); anything else they or the
libraries print goes to the run's log.
"""
