"""tfweave.serving: TF Serving's gRPC and REST protocols, with requests for the members of a
NetFuse merged model batched across models into one merged run.

``tfweave serve --model_base_path MERGED --enable_batching`` serves each member under its own
name; ``ModelServer(ServerOptions(...))`` embeds the same server in a program.
"""

from tfweave.serving.model_config import BatchingParameters, ModelEntry
from tfweave.serving.server import ModelServer, ServerOptions, entries_for_base_path

__all__ = ["BatchingParameters", "ModelEntry", "ModelServer", "ServerOptions",
           "entries_for_base_path"]
