"""AdminService: reload the bundle and report status over gRPC (proto <-> ModelManager)."""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable

import grpc
from google.protobuf import timestamp_pb2

from one2one.v1 import admin_pb2, admin_pb2_grpc
from server.model_manager import ModelManager, ReloadOutcome

log = logging.getLogger(__name__)

_RESULTS = {
    "loaded": admin_pb2.LOADED,
    "unchanged": admin_pb2.UNCHANGED,
    "refused": admin_pb2.REFUSED,
    "none": admin_pb2.NOTHING_PUBLISHED,
}


def outcome_to_proto(outcome: ReloadOutcome) -> admin_pb2.ReloadBundleResponse:
    """The proto form of a reload outcome."""
    return admin_pb2.ReloadBundleResponse(
        result=_RESULTS[outcome.result],
        version=outcome.version,
        serving_version=outcome.serving_version,
        reason=outcome.reason,
        error=outcome.error,
        seconds=outcome.seconds,
    )


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Reloads run on the RPC's own thread, serialised with the poll by the manager's lock.

    Parameters
    ----------
    models : ModelManager
        The manager to reload.
    on_loaded : callable
        Called after a bundle is swapped in (turns health SERVING).
    """

    def __init__(self, models: ModelManager, on_loaded: Callable[[], None]):
        self.models = models
        self.on_loaded = on_loaded

    def ReloadBundle(self, request, context: grpc.ServicerContext) -> admin_pb2.ReloadBundleResponse:
        outcome = self.models.reload(trigger="admin", force=True)
        if outcome.result == "loaded":
            self.on_loaded()
        return outcome_to_proto(outcome)

    def GetStatus(self, request, context: grpc.ServicerContext) -> admin_pb2.GetStatusResponse:
        models = self.models
        # `artifacts` stays empty: a filesystem path tells a caller about the host, nothing about
        # what is served; `version` names the bundle.
        resp = admin_pb2.GetStatusResponse(serving=models.loaded, version=models.version)
        if models.loaded:
            created = models.current().model.manifest.get("created_at")
            if created:
                resp.build_time.CopyFrom(_timestamp(_dt.datetime.fromisoformat(created).timestamp()))
            resp.load_time.CopyFrom(_timestamp(models.loaded_at))
        if models.last_outcome is not None:
            resp.last_reload.CopyFrom(outcome_to_proto(models.last_outcome))
        return resp
