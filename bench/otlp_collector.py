"""An OTLP/gRPC trace collector that only counts the spans it receives (bench/otlp.sh)."""
import grpc, sys, signal
from concurrent import futures
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts, trace_service_pb2_grpc as tsg
n = 0
class S(tsg.TraceServiceServicer):
    def Export(self, req, ctx):
        global n
        n += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        return ts.ExportTraceServiceResponse()
srv = grpc.server(futures.ThreadPoolExecutor(2)); tsg.add_TraceServiceServicer_to_server(S(), srv)
srv.add_insecure_port(f"127.0.0.1:{sys.argv[1] if len(sys.argv) > 1 else 4399}"); srv.start()
def bye(*a):
    print("spans received:", n, flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, bye); srv.wait_for_termination()
