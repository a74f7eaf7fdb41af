"""Model builders (one module per paper model), their layers, and the SavedModel export."""
