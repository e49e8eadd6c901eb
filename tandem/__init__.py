"""The contract both tiers of tandem share: the cluster file (`tandem.config`), the route
token (`tandem.token`), the cluster view's header (`tandem.view`), their errors
(`tandem.errors`) and structured logging (`tandem.logs`). The proxy (`proxy`) and the
backend runtime (`backends`) import it; it imports neither. `tandem.client` is the
replica-aware client for Python callers (docs/client.md)."""
