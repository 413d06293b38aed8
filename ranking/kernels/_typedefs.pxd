# The one place where the fixed-width C types of the ranking kernels are named.
#
# Scores and embeddings are float32, ids and CSR indices int32, masks uint8
# (NumPy bool arrays are viewed as uint8 by the Python wrappers), clock values
# int64 nanoseconds. Loop indices are Py_ssize_t and need no typedef.
# Mirrors sklearn/utils/_typedefs.pxd.

ctypedef float float32_t
ctypedef double float64_t
ctypedef unsigned char uint8_t
ctypedef int int32_t
ctypedef long long int64_t
