"""The virtual network: topology, carriers (memory, loopback, netns), transports, middleboxes, capture."""
