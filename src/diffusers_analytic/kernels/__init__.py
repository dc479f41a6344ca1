"""Pure tensor math below the denoisers: the noise schedule, the streamed softmax, stored images and their
statistics, the empirical posterior, streaming moments, patches and the FAISS index. Modules here import only
`diffusers_analytic.data` and each other."""
