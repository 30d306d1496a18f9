"""Every local instance by name, each with its Server in the cluster on its port.

A Server is identified by its URL, so an instance that moves to another port gets a new
Server (and the old one leaves the cluster).
"""

from __future__ import annotations

from collections.abc import Iterator

from mvtui.cluster.state import Cluster, Server
from mvtui.config.schema import InstanceConfig
from mvtui.errors import CommandError, UnknownServer
from mvtui.instances.ports import in_range, initial_port, port_for_start
from mvtui.instances.record import Instance, server_config_for


class Registry:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.instances: dict[str, Instance] = {}

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self.instances.values()))

    def add(self, config: InstanceConfig, origin: str) -> Instance:
        if config.label in self.instances:
            raise CommandError(f"an instance named {config.label!r} exists already")
        wanted = server_config_for(config, initial_port(config, self._ports_besides(config.label)))
        if wanted.url in self.cluster.servers:
            owner = self.cluster.servers[wanted.url].name
            raise CommandError(f"instance {config.label}: {wanted.url} is already {owner}'s; choose another port")
        server = self.cluster.add(wanted)
        server.lifecycle = "stopped"
        instance = Instance(config, server, origin)
        self.instances[config.label] = instance
        return instance

    def forget(self, instance: Instance) -> None:
        if self.instances.get(instance.label) is instance:
            del self.instances[instance.label]
            self.cluster.forget(instance.server)

    def find(self, key: str) -> Instance:
        if key in self.instances:
            return self.instances[key]
        matches = [instance for instance in self.instances.values() if instance.matches(key) or instance.server.name == key]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise CommandError(f"{key!r} matches several instances ({', '.join(i.label for i in matches)}); use a name")
        raise UnknownServer(f"no instance named {key!r}; instances: {', '.join(self.instances) or 'none'}")

    def for_server(self, server: Server) -> Instance | None:
        return next((instance for instance in self.instances.values() if instance.server is server), None)

    def use_config(self, instance: Instance, config: InstanceConfig) -> None:
        """New settings for a stopped instance; its port stays when it still fits them."""
        instance.config = config
        instance.pending_config = None
        keep = in_range(instance.port, config.port_range)
        self.move(instance, config.port or (instance.port if keep else initial_port(config, self._ports_besides(config.label))))

    def choose_port(self, instance: Instance) -> None:
        """Before a start: move the instance off its port if something else listens there."""
        port = port_for_start(instance.config, instance.port, self._ports_besides(instance.label))
        if port != instance.port:
            self.move(instance, port)

    def move(self, instance: Instance, port: int) -> None:
        """Point the instance's Server at `port` (a new URL is a new Server)."""
        wanted = server_config_for(instance.config, port)
        old = instance.server
        if wanted.url == old.url:
            old.config = wanted
            return
        if wanted.url in self.cluster.servers:
            raise CommandError(f"instance {instance.label}: {wanted.url} is already {self.cluster.servers[wanted.url].name}'s")
        self.cluster.forget(old)
        server = self.cluster.add(wanted)
        server.lifecycle = old.lifecycle
        instance.server = server

    def _ports_besides(self, label: str) -> set[int]:
        return {instance.port for instance in self.instances.values() if instance.label != label}
