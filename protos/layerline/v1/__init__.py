"""Generated protobuf code for the layerline.v1 wire protocol."""
