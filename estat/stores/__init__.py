"""Where objects are stored: the `Store` interface and its errors
(`estat.stores.base`), a local directory, S3; `make_store` picks one."""
