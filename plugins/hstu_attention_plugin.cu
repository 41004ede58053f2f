// grc::HSTUAttention as a TensorRT IPluginV3 (name "HSTUAttention", version "1", namespace "grc").
//
// The ONNX parser maps each `grc::HSTUAttention` node written by graph surgery to this plugin: it
// looks the creator up by op_type + the node's plugin_version / plugin_namespace attributes and
// passes the other attributes as plugin fields (ONNX INT -> kINT32, FLOAT -> kFLOAT32). The same
// library serves TensorRT and TensorRT-RTX: it only uses the versioned IPluginV3One* interfaces and
// links no TensorRT library, and CUDA's runtime is linked statically (nvcc's default).
//
// Inputs (surgery order): q, k [B,N,H,Dqk]; v [B,N,H,Dv]; lengths, num_candidates [B]; timestamps [B,N];
// pos_w [H,2P-1]; ts_w [H,NB]. Output [B,N,H,Dv]. Float inputs share one type (fp32, fp16 or bf16:
// the graph decides, networks are strongly typed); the three index inputs share int64 or int32.
#include "NvInferRuntime.h"
#include "hstu_attention_kernel.cuh"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace grc_plugins
{
constexpr char const* kName = "HSTUAttention";
constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "grc";
constexpr int32_t kNbInputs = 8;
enum Input : int32_t { kQ = 0, kK, kV, kLengths, kNumCandidates, kTimestamps, kPosW, kTsW, kOut };

void logError(char const* what)
{
    std::fprintf(stderr, "[grc HSTUAttention] %s\n", what);
}

struct Attrs
{
    int32_t numHeads{0}, headDimQk{0}, headDimV{0};
    float alpha{1.f}, norm{1.f};
    int32_t causal{1}, positionBuckets{0}, timeBuckets{0};

    bool valid() const
    {
        return numHeads > 0 && headDimQk > 0 && headDimV > 0 && headDimV <= kMaxHeadDim && headDimQk <= kMaxHeadDim
            && norm != 0.f && positionBuckets > 0 && timeBuckets > 0;
    }
};

// One table of (name, type, member) so the serialized fields and the creator's field list never drift apart.
std::vector<PluginField> fieldsOf(Attrs* a)
{
    return {PluginField("num_heads", a ? &a->numHeads : nullptr, PluginFieldType::kINT32, 1),
        PluginField("head_dim_qk", a ? &a->headDimQk : nullptr, PluginFieldType::kINT32, 1),
        PluginField("head_dim_v", a ? &a->headDimV : nullptr, PluginFieldType::kINT32, 1),
        PluginField("alpha", a ? &a->alpha : nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("norm", a ? &a->norm : nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("causal", a ? &a->causal : nullptr, PluginFieldType::kINT32, 1),
        PluginField("position_buckets", a ? &a->positionBuckets : nullptr, PluginFieldType::kINT32, 1),
        PluginField("time_buckets", a ? &a->timeBuckets : nullptr, PluginFieldType::kINT32, 1)};
}

bool isFloatType(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

bool isIndexType(DataType t)
{
    return t == DataType::kINT32 || t == DataType::kINT64;
}

class HSTUAttentionPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    explicit HSTUAttentionPlugin(Attrs const& a) : mAttrs(a) { bindFields(); }
    HSTUAttentionPlugin(HSTUAttentionPlugin const& other) : mAttrs(other.mAttrs) { bindFields(); }
    HSTUAttentionPlugin& operator=(HSTUAttentionPlugin const&) = delete;

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override { return new (std::nothrow) HSTUAttentionPlugin(*this); }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != 1)
        {
            logError("expects 8 inputs (q, k, v, lengths, num_candidates, timestamps, pos_w, ts_w) and 1 output");
            return -1;
        }
        Dims const& q = in[kQ].desc.dims;
        Dims const& v = in[kV].desc.dims;
        bool const ok = q.nbDims == 4 && v.nbDims == 4 && in[kPosW].desc.dims.nbDims == 2
            && in[kTsW].desc.dims.nbDims == 2 && (q.d[2] < 0 || q.d[2] == mAttrs.numHeads)
            && (q.d[3] < 0 || q.d[3] == mAttrs.headDimQk) && (v.d[3] < 0 || v.d[3] == mAttrs.headDimV);
        if (!ok)
            logError("input shapes do not match the node attributes num_heads / head_dim_qk / head_dim_v");
        return ok ? 0 : -1;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t, DataType const* inputTypes, int32_t) const noexcept override
    {
        outputTypes[0] = inputTypes[kQ];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t, DimsExprs const*, int32_t, DimsExprs* outputs, int32_t,
        IExprBuilder&) noexcept override
    {
        outputs[0] = inputs[kV];  // [B, N, H, Dv]
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t) noexcept override
    {
        PluginTensorDesc const& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR)
            return false;
        switch (pos)
        {
        case kQ: return isFloatType(d.type);
        case kLengths: return isIndexType(d.type);
        case kNumCandidates:
        case kTimestamps: return d.type == inOut[kLengths].desc.type;
        default: return pos <= nbInputs && d.type == inOut[kQ].desc.type;  // k, v, pos_w, ts_w, out
        }
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        return 0;
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        Dims const& q = inputDesc[kQ].dims;
        HstuParams p{};
        p.n = static_cast<int>(q.d[1]);
        p.heads = mAttrs.numHeads;
        p.dimQk = mAttrs.headDimQk;
        p.dimV = mAttrs.headDimV;
        p.posBuckets = mAttrs.positionBuckets;
        p.timeBuckets = mAttrs.timeBuckets;
        p.alpha = mAttrs.alpha;
        p.norm = mAttrs.norm;
        p.causal = mAttrs.causal;
        int const batch = static_cast<int>(q.d[0]);
        bool const wide = inputDesc[kLengths].type == DataType::kINT64;
        cudaError_t err = cudaErrorInvalidValue;
        switch (inputDesc[kQ].type)
        {
        case DataType::kFLOAT: err = wide ? launch<float, int64_t>(inputs, outputs, batch, p, stream)
                                          : launch<float, int32_t>(inputs, outputs, batch, p, stream); break;
        case DataType::kHALF: err = wide ? launch<__half, int64_t>(inputs, outputs, batch, p, stream)
                                         : launch<__half, int32_t>(inputs, outputs, batch, p, stream); break;
        case DataType::kBF16: err = wide ? launch<__nv_bfloat16, int64_t>(inputs, outputs, batch, p, stream)
                                         : launch<__nv_bfloat16, int32_t>(inputs, outputs, batch, p, stream); break;
        default: break;
        }
        if (err != cudaSuccess)
        {
            logError(cudaGetErrorString(err));
            return -1;
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mCollection; }

private:
    template <typename T, typename I>
    static cudaError_t launch(
        void const* const* in, void* const* out, int batch, HstuParams const& p, cudaStream_t stream)
    {
        return launchHstuAttention<T, I>(static_cast<T const*>(in[kQ]), static_cast<T const*>(in[kK]),
            static_cast<T const*>(in[kV]), static_cast<I const*>(in[kLengths]),
            static_cast<I const*>(in[kNumCandidates]), static_cast<I const*>(in[kTimestamps]),
            static_cast<T const*>(in[kPosW]), static_cast<T const*>(in[kTsW]), static_cast<T*>(out[0]), batch, p,
            stream);
    }

    void bindFields()
    {
        mFields = fieldsOf(&mAttrs);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    Attrs mAttrs;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

class HSTUAttentionCreator : public IPluginCreatorV3One
{
public:
    HSTUAttentionCreator()
    {
        mFields = fieldsOf(nullptr);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        Attrs a;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.data == nullptr || f.length < 1)
                continue;
            std::string const n(f.name);
            if (n == "num_heads") a.numHeads = toInt(f);
            else if (n == "head_dim_qk") a.headDimQk = toInt(f);
            else if (n == "head_dim_v") a.headDimV = toInt(f);
            else if (n == "alpha") a.alpha = toFloat(f);
            else if (n == "norm") a.norm = toFloat(f);
            else if (n == "causal") a.causal = toInt(f);
            else if (n == "position_buckets") a.positionBuckets = toInt(f);
            else if (n == "time_buckets") a.timeBuckets = toInt(f);
        }
        if (!a.valid())
        {
            std::string const msg = std::string("node ") + (name ? name : "?")
                + ": missing or invalid attributes (need num_heads, head_dim_qk, head_dim_v <= 1024, norm != 0, "
                  "position_buckets, time_buckets)";
            logError(msg.c_str());
            return nullptr;
        }
        return new (std::nothrow) HSTUAttentionPlugin(a);
    }

    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    // The parser sends INT32 / FLOAT32; a hand-built field collection may use the 64-bit types.
    static int32_t toInt(PluginField const& f)
    {
        switch (f.type)
        {
        case PluginFieldType::kINT32: return *static_cast<int32_t const*>(f.data);
        case PluginFieldType::kINT64: return static_cast<int32_t>(*static_cast<int64_t const*>(f.data));
        default: return 0;
        }
    }
    static float toFloat(PluginField const& f)
    {
        switch (f.type)
        {
        case PluginFieldType::kFLOAT32: return *static_cast<float const*>(f.data);
        case PluginFieldType::kFLOAT64: return static_cast<float>(*static_cast<double const*>(f.data));
        default: return 0.f;
        }
    }

    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};
} // namespace grc_plugins

// Entry points IPluginRegistry::loadLibrary looks up (V3 plugins: getCreators; setLoggerFinder is
// required by the loader's contract, the plugin logs to stderr instead).
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder*) {}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static grc_plugins::HSTUAttentionCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
