// moe_dist.plan: makes a CPU-only torch build treat (fake) cuda tensors as an accelerator without any CUDA code, for
// FakeTensorMode planning only (no CUDA kernel ever runs: fake tensors have no data).
//  1. a do-nothing DeviceGuardImpl for CUDA (device 0, default stream, events that are always complete):
//     Python bindings that open a DeviceGuard on a cuda tensor (Tensor.copy_, .to("cuda"), new_tensor,
//     nn.Linear's init, embedding, ...) otherwise raise -- or abort the process -- with
//     "PyTorch is not linked with support for cuda devices";
//  2. CUDA hooks whose isBuilt() is true, so at::accelerator::getAccelerator() answers cuda: the autograd
//     engine asks for the current stream of every cuda gradient, which otherwise raises
//     "Cannot access accelerator device when none is available".
// Must be loaded (ctypes.CDLL) before `import torch`: torch's import looks the CUDA hooks up once.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <atomic>

namespace {
using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

std::atomic<DeviceIndex> g_device{0};

struct FakeCUDAGuardImpl final : c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device d) const override {
    Device old = getDevice();
    setDevice(d);
    return old;
  }
  Device getDevice() const override { return Device(DeviceType::CUDA, g_device.load()); }
  void setDevice(Device d) const override {
    if (d.index() >= 0) g_device.store(d.index());
  }
  void uncheckedSetDevice(Device d) const noexcept override {
    if (d.index() >= 0) g_device.store(d.index());
  }
  Stream getStream(Device d) const noexcept override { return Stream(Stream::DEFAULT, d); }
  Stream getNewStream(Device d, int = 0) const override { return Stream(Stream::DEFAULT, d); }
  Stream getStreamFromGlobalPool(Device d, bool = false) const override { return Stream(Stream::DEFAULT, d); }
  Stream exchangeStream(Stream s) const noexcept override { return s; }
  DeviceIndex deviceCount() const noexcept override { return 8; }
  // Events: recorded at once, always complete (there is no real work to wait for).
  void record(void** event, const Stream&, const DeviceIndex, const c10::EventFlag) const override {
    static int dummy;
    *event = &dummy;
  }
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  bool queryStream(const Stream&) const override { return true; }
  void synchronizeStream(const Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const DeviceIndex) const override {}
  double elapsedTime(void*, void*, const DeviceIndex) const override { return 0.0; }
  void recordDataPtrOnStream(const c10::DataPtr&, const Stream&) const override {}
};

struct FakeCUDAHooks : at::CUDAHooksInterface {
  FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return false; }
  bool hasPrimaryContext(DeviceIndex) const override { return false; }
  DeviceIndex deviceCount() const override { return 8; }
  DeviceIndex getCurrentDevice() const override { return g_device.load(); }
  DeviceIndex current_device() const override { return g_device.load(); }
};

struct Registrar {
  Registrar() {
    if (!c10::impl::hasDeviceGuardImpl(DeviceType::CUDA)) {
      static FakeCUDAGuardImpl impl;
      c10::impl::registerDeviceGuard(DeviceType::CUDA, &impl);
    }
  }
} registrar;

}  // namespace

namespace at {
// Under the key the real libtorch_cuda uses ("CUDAHooks"); getCUDAHooks() creates it on first use.
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, FakeCUDAHooks);
}  // namespace at

extern "C" int moe_dist_fake_cuda_hooks_built() { return at::detail::getCUDAHooks().isBuilt() ? 1 : 0; }
