"""The virtual network: topology, carriers (memory, loopback), transports, middleboxes, capture."""
