// A CUPTI injection library for the GPU check's profile: counts every CUDA driver API call by
// name (host synchronisations, kernel launches, allocations) and sums each kernel's device
// time, between two marks the profiled program sets.
//
//   scripts/gpu-check.sh build   # compiles it into target/gpu-check/libcupti_counts.so
//   CUDA_INJECTION64_PATH=$PWD/target/gpu-check/libcupti_counts.so target/gpu-check/gpu_check --profile
//
// The driver loads it at cuInit and calls InitializeInjection. The program (examples/gpu_check.rs)
// finds the two marks with dlopen on the same path: lisa_cupti_begin() clears the counts,
// lisa_cupti_end(name, steps) flushes the kernel records and prints one JSON line on stdout:
// {"check":"profile-counts","name":..,"steps":..,"api":{call: calls per step},
//  "kernel_ms":device ms per step,"kernels":[[kernel, launches per step, ms per step], ...]}.
// With LISA_CUPTI_WHOLE=name it counts a whole process instead (see InitializeInjection).
#include <cupti.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_API 1024
#define MAX_KERNELS 2048
#define BUFFER_BYTES (8u << 20)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t api_calls[MAX_API];
static struct {
    char *name;
    uint64_t launches;
    uint64_t ns;
} kernels[MAX_KERNELS];
static int n_kernels;
static int counting;

static void CUPTIAPI on_api(void *user, CUpti_CallbackDomain domain, CUpti_CallbackId cbid,
                            const void *data) {
    (void)user;
    const CUpti_CallbackData *cb = (const CUpti_CallbackData *)data;
    if (domain != CUPTI_CB_DOMAIN_DRIVER_API || cb->callbackSite != CUPTI_API_ENTER) return;
    if (cbid < MAX_API && __atomic_load_n(&counting, __ATOMIC_RELAXED))
        __atomic_fetch_add(&api_calls[cbid], 1, __ATOMIC_RELAXED);
}

static void CUPTIAPI on_request(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = (uint8_t *)aligned_alloc(8, BUFFER_BYTES);
    *size = BUFFER_BYTES;
    *max_records = 0;
}

static void add_kernel(const char *name, uint64_t ns) {
    for (int i = 0; i < n_kernels; i++) {
        if (strcmp(kernels[i].name, name) == 0) {
            kernels[i].launches++;
            kernels[i].ns += ns;
            return;
        }
    }
    if (n_kernels < MAX_KERNELS) {
        kernels[n_kernels].name = strdup(name);
        kernels[n_kernels].launches = 1;
        kernels[n_kernels].ns = ns;
        n_kernels++;
    }
}

static void CUPTIAPI on_complete(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                                 size_t valid) {
    (void)ctx;
    (void)stream;
    (void)size;
    CUpti_Activity *record = NULL;
    pthread_mutex_lock(&lock);
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL ||
            record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
            const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)record;
            if (__atomic_load_n(&counting, __ATOMIC_RELAXED))
                add_kernel(k->name ? k->name : "?", k->end - k->start);
        }
    }
    pthread_mutex_unlock(&lock);
    free(buffer);
}

void lisa_cupti_end(const char *name, int steps);

static void at_exit(void) { lisa_cupti_end(getenv("LISA_CUPTI_WHOLE"), 1); }

int InitializeInjection(void) {
    CUpti_SubscriberHandle subscriber;
    if (cuptiSubscribe(&subscriber, (CUpti_CallbackFunc)on_api, NULL) != CUPTI_SUCCESS) return 0;
    cuptiEnableDomain(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API);
    cuptiActivityRegisterCallbacks(on_request, on_complete);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    // LISA_CUPTI_WHOLE=name: count the whole process (a program without marks) and print the
    // counts under that name at exit.
    if (getenv("LISA_CUPTI_WHOLE")) {
        __atomic_store_n(&counting, 1, __ATOMIC_RELAXED);
        atexit(at_exit);
    }
    return 1;
}

void lisa_cupti_begin(void) {
    cuptiActivityFlushAll(1);
    pthread_mutex_lock(&lock);
    memset(api_calls, 0, sizeof api_calls);
    for (int i = 0; i < n_kernels; i++) free(kernels[i].name);
    n_kernels = 0;
    __atomic_store_n(&counting, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&lock);
}

static int by_time(const void *a, const void *b) {
    uint64_t x = ((const typeof(kernels[0]) *)a)->ns, y = ((const typeof(kernels[0]) *)b)->ns;
    return x < y ? 1 : x > y ? -1 : 0;
}

// Prints the counts since lisa_cupti_begin, divided by `steps`, and stops counting.
void lisa_cupti_end(const char *name, int steps) {
    cuptiActivityFlushAll(1);
    pthread_mutex_lock(&lock);
    __atomic_store_n(&counting, 0, __ATOMIC_RELAXED);
    double per = steps > 0 ? 1.0 / steps : 1.0;
    printf("{\"check\":\"profile-counts\",\"name\":\"%s\",\"steps\":%d,\"api\":{", name, steps);
    int first = 1;
    for (int i = 0; i < MAX_API; i++) {
        if (!api_calls[i]) continue;
        const char *api = NULL;
        cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, (uint32_t)i, &api);
        printf("%s\"%s\":%.2f", first ? "" : ",", api ? api : "?", api_calls[i] * per);
        first = 0;
    }
    qsort(kernels, n_kernels, sizeof kernels[0], by_time);
    uint64_t total_ns = 0, launches = 0;
    for (int i = 0; i < n_kernels; i++) {
        total_ns += kernels[i].ns;
        launches += kernels[i].launches;
    }
    printf("},\"kernel_launches\":%.1f,\"kernel_ms\":%.3f,\"kernels\":[", launches * per,
           total_ns * per / 1e6);
    for (int i = 0; i < n_kernels && i < 25; i++) {
        // Kernel names are C identifiers or mangled C++ names: no quotes or backslashes.
        char short_name[96];
        snprintf(short_name, sizeof short_name, "%s", kernels[i].name);
        printf("%s[\"%s\",%.1f,%.3f]", i ? "," : "", short_name, kernels[i].launches * per,
               kernels[i].ns * per / 1e6);
    }
    printf("]}\n");
    fflush(stdout);
    pthread_mutex_unlock(&lock);
}
