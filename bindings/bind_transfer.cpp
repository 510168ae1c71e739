// kvbm._native transfer engine bindings (UCX). Only conversions: the logic is in transfer/.
#ifdef KVBM_WITH_UCX
#include <optional>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "transfer/engine.h"

namespace kvbm::bind {
namespace {

using transfer::Endpoint;
using transfer::Engine;
using transfer::MemKind;
using transfer::Op;
using transfer::Region;
using transfer::Request;
using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

U64Array u64_arg(py::handle obj, const char* what) {
  if (py::isinstance<py::int_>(obj)) {
    U64Array a(1);
    a.mutable_data()[0] = obj.cast<uint64_t>();
    return a;
  }
  U64Array a = U64Array::ensure(obj);
  if (!a || a.ndim() != 1)
    fail(Code::kInvalidArgument, std::string(what) + ": expected a 1-D sequence of unsigned 64-bit integers");
  return a;
}

std::shared_ptr<Request> do_transfer(Endpoint& ep, Op op, py::handle local, py::handle remote, py::handle lengths,
                                     py::object notify) {
  U64Array l = u64_arg(local, "local"), r = u64_arg(remote, "remote"), n = u64_arg(lengths, "lengths");
  if (l.size() != r.size())
    fail(Code::kInvalidArgument, "local has " + std::to_string(l.size()) + " addresses but remote has " +
                                     std::to_string(r.size()));
  std::string msg;
  bool has_notify = !notify.is_none();
  if (has_notify) msg = notify.cast<std::string>();
  StatusOr<std::shared_ptr<Request>> res = Status::Ok();
  {
    py::gil_scoped_release nogil;
    res = ep.transfer(op, l.data(), r.data(), n.data(), static_cast<size_t>(l.size()), static_cast<size_t>(n.size()),
                      has_notify ? &msg : nullptr);
  }
  return check(std::move(res));
}

std::optional<double> no_timeout() { return std::nullopt; }

}  // namespace
}  // namespace kvbm::bind

KVBM_BINDINGS(transfer, 40) {
  using namespace kvbm;
  using namespace kvbm::bind;

  py::class_<Request, std::shared_ptr<Request>>(m, "TransferRequest",
                                                "Completion of one batch of puts/gets, a flush or a notification.")
      .def("test",
           [](const Request& self) {
             if (!self.done()) return false;
             check(self.status());
             return true;
           },
           "True when complete; raises the request's error if it failed; False while in flight.")
      .def("wait",
           [](Request& self, std::optional<double> timeout) {
             Status st;
             {
               py::gil_scoped_release nogil;
               st = self.wait(timeout ? *timeout : -1.0);
             }
             check(st);
           },
           py::arg("timeout") = no_timeout(),
           "Wait for completion; raises TransferTimeoutError past `timeout` s, PeerError if the peer failed.")
      .def_property_readonly("done", &Request::done)
      .def_property_readonly("bytes", &Request::bytes)
      .def_property_readonly("count", &Request::count)
      .def_property_readonly("cuda_ipc", &Request::cuda_ipc, "True when the bytes moved through the CUDA IPC path.")
      .def_property_readonly("error",
                             [](const Request& self) -> py::object {
                               Status s = self.status();
                               if (s.ok()) return py::none();
                               return py::str(s.to_string());
                             });

  py::class_<Region, std::shared_ptr<Region>>(m, "MemoryRegion", "Memory registered with the UCX context.")
      .def_readonly("id", &Region::id)
      .def_readonly("addr", &Region::addr)
      .def_readonly("length", &Region::length)
      .def_property_readonly("memory", [](const Region& r) { return r.kind == MemKind::kCuda ? "cuda" : "host"; })
      .def_property_readonly("rkey", [](const Region& r) { return py::bytes(r.rkey); })
      .def_readonly("device", &Region::device)
      .def_property_readonly("ipc", [](const Region& r) { return py::bytes(r.ipc); },
                             "Encoded CUDA IPC descriptor for peers (empty: not exported).")
      .def_readonly("ipc_note", &Region::ipc_note, "Why the region was not exported for CUDA IPC.");

  py::class_<Endpoint, std::shared_ptr<Endpoint>>(m, "UcxEndpoint", "A connection to one peer engine.")
      .def_property_readonly("peer_name", &Endpoint::peer_name)
      .def("add_remote_region",
           [](Endpoint& self, uint64_t addr, uint64_t length, py::bytes rkey, py::bytes ipc) {
             std::string k = rkey, d = ipc;
             StatusOr<uint32_t> r = Status::Ok();
             {
               py::gil_scoped_release nogil;
               r = self.add_remote_region(addr, length, k, d);
             }
             return check(std::move(r));
           },
           py::arg("addr"), py::arg("length"), py::arg("rkey"), py::arg("ipc") = py::bytes())
      .def("put",
           [](Endpoint& self, py::handle local, py::handle remote, py::handle lengths, py::object notify) {
             return do_transfer(self, Op::kPut, local, remote, lengths, notify);
           },
           py::arg("local"), py::arg("remote"), py::arg("lengths"), py::arg("notify") = py::none())
      .def("get",
           [](Endpoint& self, py::handle local, py::handle remote, py::handle lengths, py::object notify) {
             return do_transfer(self, Op::kGet, local, remote, lengths, notify);
           },
           py::arg("local"), py::arg("remote"), py::arg("lengths"), py::arg("notify") = py::none())
      .def("notify", [](Endpoint& self, py::bytes msg) { return check(self.notify(std::string(msg))); },
           py::arg("message"), py::call_guard<py::gil_scoped_release>())
      .def("flush", [](Endpoint& self) { return check(self.flush()); }, py::call_guard<py::gil_scoped_release>())
      .def("close", [](Endpoint& self, bool force, double timeout) { check(self.close(force, timeout)); },
           py::arg("force") = false, py::arg("timeout") = 5.0, py::call_guard<py::gil_scoped_release>())
      .def("check_health", [](const Endpoint& self) { check(self.health()); },
           "Raises PeerError if the peer failed or the endpoint was closed.")
      .def_property_readonly("failed", [](const Endpoint& self) { return !self.health().ok(); })
      .def_property_readonly("num_remote_regions", &Endpoint::num_remote_regions)
      .def_property_readonly("cuda_ipc", &Endpoint::cuda_ipc,
                             "Whether transfers to this peer can take the CUDA IPC path (some region mappable).")
      .def("cuda_ipc_states", &Endpoint::cuda_ipc_states, py::call_guard<py::gil_scoped_release>(),
           "(addr, state) of each remote region's CUDA IPC side: none, other host, not mapped, mapped, failed: ...");

  py::class_<Engine, std::shared_ptr<Engine>>(m, "UcxEngine", "A UCP context + worker (see transfer/engine.h).")
      .def(py::init([](const std::string& lib_dir, const std::string& name, const std::string& transports,
                       const std::string& net_devices, bool error_handling, bool progress_thread, int64_t spin_us,
                       bool cuda, bool cuda_ipc) {
             transfer::EngineOptions o;
             o.ucx_lib_dir = lib_dir;
             o.name = name;
             o.transports = transports;
             o.net_devices = net_devices;
             o.error_handling = error_handling;
             o.progress_thread = progress_thread;
             o.spin_us = spin_us;
             o.cuda = cuda;
             o.cuda_ipc = cuda_ipc;
             StatusOr<std::shared_ptr<Engine>> e = Status::Ok();
             {
               py::gil_scoped_release nogil;
               e = Engine::create(o);
             }
             return check(std::move(e));
           }),
           py::arg("lib_dir"), py::arg("name"), py::arg("transports") = "", py::arg("net_devices") = "",
           py::arg("error_handling") = true, py::arg("progress_thread") = true, py::arg("spin_us") = 200,
           py::arg("cuda") = false, py::arg("cuda_ipc") = true)
      .def_property_readonly("address", [](const Engine& e) { return py::bytes(e.address()); })
      .def_property_readonly("ucx_version", &Engine::ucx_version)
      .def_property_readonly("closed", &Engine::closed)
      .def_property_readonly("cuda_ipc", &Engine::cuda_ipc,
                             "Whether this engine runs the same-host CUDA IPC path (option on and a GPU present).")
      .def("register",
           [](Engine& e, uint64_t addr, uint64_t length, const std::string& memory) {
             MemKind k;
             if (memory == "host") k = MemKind::kHost;
             else if (memory == "cuda") k = MemKind::kCuda;
             else fail(Code::kInvalidArgument, "memory: expected 'host' or 'cuda', got '" + memory + "'");
             StatusOr<std::shared_ptr<Region>> r = Status::Ok();
             {
               py::gil_scoped_release nogil;
               r = e.register_memory(addr, length, k);
             }
             return check(std::move(r));
           },
           py::arg("addr"), py::arg("length"), py::arg("memory") = "host")
      .def("deregister", [](Engine& e, uint64_t id) { check(e.deregister(id)); }, py::arg("region_id"),
           py::call_guard<py::gil_scoped_release>())
      .def("connect",
           [](Engine& e, py::bytes address, const std::string& peer_name) {
             std::string a = address;
             StatusOr<std::shared_ptr<Endpoint>> r = Status::Ok();
             {
               py::gil_scoped_release nogil;
               r = e.connect(a, peer_name);
             }
             return check(std::move(r));
           },
           py::arg("address"), py::arg("peer_name"))
      .def("take_notifications",
           [](Engine& e, size_t max) {
             std::vector<transfer::Notification> v;
             {
               py::gil_scoped_release nogil;
               v = e.take_notifications(max);
             }
             py::list out;
             for (auto& n : v) out.append(py::make_tuple(py::bytes(n.sender), py::bytes(n.message)));
             return out;
           },
           py::arg("max") = 0)
      .def("wait_notification", [](Engine& e, std::optional<double> t) { return e.wait_notification(t ? *t : -1.0); },
           py::arg("timeout") = no_timeout(), py::call_guard<py::gil_scoped_release>())
      .def("progress", &Engine::progress, py::call_guard<py::gil_scoped_release>())
      .def("shutdown", &Engine::shutdown, py::call_guard<py::gil_scoped_release>());

  m.def("_cuda_ipc_descriptor",
        [](py::bytes handle, uint64_t offset, std::optional<std::string> host, bool same_process, int device) {
          transfer::cuda_ipc::Descriptor d;
          d.handle = handle;
          d.offset = offset;
          d.device = device;
          d.process = same_process ? transfer::cuda_ipc::process_token() : ~transfer::cuda_ipc::process_token();
          d.host = host ? *host : transfer::cuda_ipc::host_identity();
          return py::bytes(transfer::cuda_ipc::encode(d));
        },
        py::arg("handle"), py::arg("offset") = 0, py::arg("host") = py::none(), py::arg("same_process") = false,
        py::arg("device") = 0,
        "Test hook: an encoded CUDA IPC descriptor (host None = this host) as a region's metadata carries it.");
}
#endif  // KVBM_WITH_UCX
