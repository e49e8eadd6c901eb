"""The contract both tiers of tandem share: the cluster file (`tandem.config`), the route
token (`tandem.token`), their errors (`tandem.errors`) and structured logging
(`tandem.logs`). The proxy (`proxy`) and the backend runtime (`backends`) import it; it
imports neither."""
