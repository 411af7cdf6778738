"""Where objects are stored: the `Store` interface and its errors
(`base`), the file primitives (`fsutil`), a local directory (`local`), S3
(`s3`, `s3_errors`, `httpclient`); `factory.make_store` picks one."""
